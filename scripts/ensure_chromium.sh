#!/usr/bin/env bash
# The HTML-report tests render pages in headless Chromium (Debian's package). Install it when it
# is missing and we are root (CI, a fresh machine); otherwise say how.
set -u
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium for the report tests (apt-get)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null && exit 0
fi
echo "warning: chromium is not installed; the report rendering test will be skipped (apt-get install chromium)" >&2
exit 0
