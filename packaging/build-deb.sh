#!/bin/bash
# Builds the workqd .deb from the working tree (tracked and new files, as
# .gitignore allows) in a temporary copy, so the tree stays clean; puts it in
# dist/ and prints its path.
#
#   packaging/build-deb.sh [--version VERSION] [--outdir DIR]
#
# --version builds the same tree as another Debian version (a changelog entry
# added in the copy), e.g. an older one to test upgrades.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
version=
outdir=$top/dist
while [ $# -gt 0 ]; do
    case $1 in
        --version) version=$2; shift 2 ;;
        --outdir) outdir=$2; shift 2 ;;
        -h|--help) sed -n '2,9s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "build-deb.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

build_deps=(dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools)
missing=()
for p in "${build_deps[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q ' installed$' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "build-deb.sh: missing build dependencies: ${missing[*]} (install them as root)" >&2
        exit 1
    fi
    echo "installing build dependencies: ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >&2
fi

work=$(mktemp -d /tmp/workqd-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir "$work/src"
if git -C "$top" rev-parse --git-dir >/dev/null 2>&1; then
    git -C "$top" ls-files -z --cached --others --exclude-standard \
        | (cd "$top" && while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done) \
        | tar -C "$top" --null -T - -cf - | tar -C "$work/src" -xf -
else
    tar -C "$top" --exclude=.git --exclude=./dist --exclude=./build --exclude='./.venv*' \
        --exclude=__pycache__ --exclude='*.egg-info' --exclude=./.pybuild -cf - . \
        | tar -C "$work/src" -xf -
fi

if [ -n "$version" ]; then
    cl=$work/src/debian/changelog
    maint=$(dpkg-parsechangelog -l "$cl" -S Maintainer)
    { printf 'workqd (%s) unstable; urgency=medium\n\n  * Build of the working tree as %s.\n\n -- %s  %s\n\n' \
          "$version" "$version" "$maint" "$(date -R)"; cat "$cl"; } >"$cl.new"
    mv "$cl.new" "$cl"
fi

log=$work/build.log
# Debian's python3, not a pyenv or venv one that may come first on PATH.
if ! (cd "$work/src" && env PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b) \
        >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "build-deb.sh: dpkg-buildpackage failed (log above)" >&2
    exit 1
fi
debs=("$work"/workqd_*_all.deb)
mkdir -p "$outdir"
cp "${debs[0]}" "$outdir/"
echo "$outdir/$(basename "${debs[0]}")"
