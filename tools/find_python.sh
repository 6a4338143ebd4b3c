#!/bin/sh
# Print the first Python >= 3.11 among $PYTHON (when set), python3.11, python3.12,
# python3.13 and python3; on stderr, say which one was chosen. Exit 1 with what to
# install when there is none. Used by the Makefile to create .venv.
for py in ${PYTHON:-} python3.11 python3.12 python3.13 python3; do
    command -v "$py" >/dev/null 2>&1 || continue
    version=$("$py" -c 'import sys; v = sys.version_info; print("%d.%d.%d" % v[:3]) if v >= (3, 11) else sys.exit(1)' 2>/dev/null) || continue
    here=$(pwd)
    echo "using $py (Python $version) for ${here##*/}/.venv" >&2
    echo "$py"
    exit 0
done
echo "no Python >= 3.11 found (tried: ${PYTHON:+$PYTHON }python3.11 python3.12 python3.13 python3); install Python 3.11, 3.12 or 3.13 (e.g. apt-get install python3.11 python3.11-venv) or set PYTHON=/path/to/python3.x" >&2
exit 1
