#!/usr/bin/env bash
# Screenshot of a run's report.html in headless Chromium (issue 26): checks that the page renders offline.
#   bash scripts/report_screenshot.sh OUTPUT_DIR_OR_HTML [OUT.png] [WIDTHxHEIGHT]
# Installs Debian's `chromium` package with apt-get when no Chromium is found (root only). The browser
# runs with the network off (a page needing the network would show broken images). The test suite never
# needs this script.
set -euo pipefail
target=${1:?usage: report_screenshot.sh OUTPUT_DIR_OR_HTML [OUT.png] [WIDTHxHEIGHT]}
[[ -d $target ]] && target=$target/report.html
[[ -f $target ]] || { echo "report_screenshot: $target not found" >&2; exit 2; }
out=${2:-${target%.html}.png}
size=${3:-1280x2400}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [[ -z $browser ]]; then
  if [[ $(id -u) -ne 0 ]]; then echo "report_screenshot: no Chromium; apt-get install chromium (as root)" >&2; exit 2; fi
  apt-get install -y --no-install-recommends chromium >/dev/null
  browser=$(command -v chromium)
fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$profile" \
  --proxy-server="127.0.0.1:9" --proxy-bypass-list="<-loopback>" \
  --window-size="${size/x/,}" --screenshot="$(realpath -m "$out")" "file://$(realpath "$target")" 2>/dev/null
echo "$out ($(du -k "$out" | cut -f1) KiB)"
