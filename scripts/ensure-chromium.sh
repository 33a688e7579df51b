#!/bin/sh
# Install Debian's chromium for the dashboard's browser test, only when missing and only as root.
# Playwright drives it through executable_path; we never run `playwright install` (no downloads at test time).
set -eu
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "ensure-chromium: /usr/bin/chromium is missing and we are not root; the browser test will be skipped" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium
