#!/usr/bin/env bash
# Screenshot a demo report the way a browser shows it, to check how it reads:
#   scripts/screenshot_report.sh [REPORT_HTML] [PNG] [WIDTH,HEIGHT]
# Defaults: blockskip-demo/report.html -> blockskip-demo/report.png at 1200,2400.
# Needs Chromium (Debian: apt-get install -y chromium); headless, offline, a throwaway profile.
set -euo pipefail
report=$(realpath "${1:-blockskip-demo/report.html}")
png=${2:-$(dirname "$report")/report.png}
size=${3:-1200,2400}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then
    echo "error: no chromium found; on Debian: apt-get install -y chromium" >&2
    exit 2
fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
    --disable-sync --no-first-run --hide-scrollbars --user-data-dir="$profile" \
    --screenshot="$(realpath -m "$png")" --window-size="$size" "file://$report" 2>/dev/null
echo "$png"
