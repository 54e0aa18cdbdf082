"""The admin web UI (installed as appliance.admin): pages, templates and static assets served by
the appliance itself."""
