#!/usr/bin/env bash
# Make `mpirun -np 2 python -m ep_runtime demo` work on this machine. Idempotent.
#   1. Open MPI: Debian's openmpi-bin + libopenmpi-dev, installed with apt-get when mpirun is absent
#      and we are root (elsewhere install an MPI yourself, or load its module).
#   2. mpi4py in the venv ($VENV, default .venv of this repository; else the python on PATH).
# Exits 0 when mpirun and mpi4py work, non-zero with the reason otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-$([ -x "$VENV/bin/python" ] && echo "$VENV/bin/python" || command -v python3)}

if ! command -v mpirun >/dev/null; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "setup_mpi: mpirun is absent and this is not root with apt-get; install Open MPI first" >&2
        exit 2
    fi
    echo "setup_mpi: apt-get install openmpi-bin libopenmpi-dev"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends openmpi-bin libopenmpi-dev >/dev/null \
        || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends openmpi-bin libopenmpi-dev >/dev/null; }
fi

if ! "$PY" -c "from mpi4py import MPI" 2>/dev/null; then
    echo "setup_mpi: pip install mpi4py into $PY"
    "$PY" -m pip install -q "mpi4py>=3.1"
fi
"$PY" -c "from mpi4py import MPI; print('setup_mpi: ok,', MPI.Get_library_version().splitlines()[0])"
