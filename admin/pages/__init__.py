"""The admin UI routes, one module per page."""
