#!/bin/sh
# Rebuilds kjv-train.txt and kjv-heldout.txt from Debian's bible-kjv-text package (see CORPUS.md).
# Needs the `bible` reader from the bible-kjv package; both packages are only unpacked, not installed.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
cd "$tmp"
apt-get download bible-kjv-text bible-kjv >/dev/null
for deb in *.deb; do dpkg-deb -x "$deb" root; done
root/usr/bin/bible -l100000 -p root/usr/lib "gen1:1-rev22:21" > kjv.raw
# One chapter = a header line ("Genesis 1") followed by its verses ("1 In the beginning ...").
# Every 20th chapter (the 20th, 40th, ... of the 1189) is held out; the rest is training text.
awk -v train="$here/kjv-train.txt" -v held="$here/kjv-heldout.txt" '
    /^$/ { next }
    /^[^ ]/ { c++; out = (c % 20 == 0) ? held : train; if (seen[out]++) printf "\n" > out }
    { sub(/^ +/, ""); print > out }
' kjv.raw
cd / && rm -rf "$tmp"
