#!/bin/sh
# Make sure a headless Chromium is available for the report tests (tests/test_report.py).
# Idempotent: does nothing when `chromium` (or $CHROMIUM) is already on the machine.
# Installs Debian's package with apt-get when run as root; otherwise says what to run.
# Never fails the caller: without Chromium the browser tests skip with a message.
set -u
if [ -n "${CHROMIUM:-}" ] && [ -x "$CHROMIUM" ]; then exit 0; fi
for c in chromium chromium-browser google-chrome; do
    if command -v "$c" >/dev/null 2>&1; then exit 0; fi
done
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "ensure_chromium: installing Debian's chromium for the report tests" >&2
    if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; then
        exit 0
    fi
    echo "ensure_chromium: apt-get could not install chromium; the browser tests will be skipped" >&2
else
    echo "ensure_chromium: chromium not found; run 'sudo apt-get install chromium' (the browser tests will be skipped)" >&2
fi
exit 0
