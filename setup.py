"""Package discovery for the one import root `appliance`.

export/, kernels/ and admin/ live at the top of the repository (the layout is part of the
specification) but install as appliance.export, appliance.kernels and appliance.admin; the
package-dir mapping is in pyproject.toml, and this file lists their subpackages under the
mapped names, which setuptools' automatic discovery cannot do.
"""

from setuptools import find_packages, setup

MAPPED = {
    "appliance.export": "export",
    "appliance.kernels": "kernels",
    "appliance.admin": "admin",
    "appliance.systemd": "systemd",
}

packages = find_packages(include=["appliance", "appliance.*"])
for name, folder in MAPPED.items():
    packages.append(name)
    packages.extend(f"{name}.{sub}" for sub in find_packages(where=folder))

setup(packages=packages)
