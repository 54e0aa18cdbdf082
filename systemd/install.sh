#!/usr/bin/env bash
# Install the appliance as a systemd service on a box that does not have the package yet.
#   sudo systemd/install.sh [--prefix DIR] [--dry-run] [other install-service options]
# Creates PREFIX/venv (default /opt/appliance/venv) with the runtime packages only (no torch):
# onnxruntime-gpu when an NVIDIA driver is present, onnxruntime otherwise. Then hands over to
# `appliance install-service --venv current` from that environment, which does the rest (user,
# directories, unit, config, migrations, systemctl) and prints every step.
set -euo pipefail

source_dir=$(cd "$(dirname "$0")/.." && pwd)
prefix=/opt/appliance
dry_run=0
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --prefix) prefix=${args[$((i + 1))]:?--prefix needs a directory} ;;
    --prefix=*) prefix=${args[$i]#--prefix=} ;;
    --dry-run) dry_run=1 ;;
  esac
done

# The system Python by default: the unit hides /home, /root and /tmp (ProtectHome=, PrivateTmp=),
# so an interpreter from pyenv or a home directory could not run the service.
if [ -z "${PYTHON:-}" ]; then
  if [ -x /usr/bin/python3 ]; then PYTHON=/usr/bin/python3; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] < (3, 13)))' 2>/dev/null; then
  echo "error: $PYTHON must be Python 3.11 or 3.12 (set PYTHON=...)" >&2
  exit 1
fi
if [ "$dry_run" = 0 ] && [ "$(id -u)" != 0 ]; then
  echo "error: installing a system service needs root (sudo $0 $*), or pass --dry-run" >&2
  exit 1
fi

if [ -e /proc/driver/nvidia/version ]; then extra=gpu; else extra=cpu; fi
venv="$prefix/venv"
if [ "$dry_run" = 1 ]; then
  echo "would create $venv with $PYTHON -m venv (unless it exists)"
  echo "would run $venv/bin/python -m pip install --upgrade '$source_dir[$extra]'"
  echo "would run $venv/bin/appliance install-service --venv current $*"
  exit 0
fi

umask 022
mkdir -p "$prefix"
[ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet --upgrade "$source_dir[$extra]"
exec "$venv/bin/appliance" install-service --venv current "$@"
