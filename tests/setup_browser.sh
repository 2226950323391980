#!/usr/bin/env bash
# Debian's Chromium for the browser test (tests/test_browser.py); Playwright drives it, never downloads one.
set -euo pipefail
if [ ! -x /usr/bin/chromium ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
