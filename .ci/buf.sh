#!/usr/bin/env bash
# Guards the wire contract (proto/, configured by buf.yaml at the repository root):
#   1. buf lint: STANDARD rules, with the documented v1 exceptions in buf.yaml;
#   2. buf breaking (FILE rules): the working tree's proto against the parent commit's
#      (HEAD~1), so a commit that renames, renumbers, retypes or deletes anything fails.
# buf is installed from npm (@bufbuild/buf) into a local prefix when it is not on PATH.
#
# Environment:
#   BUF               a buf binary to use instead of installing one
#   BUF_PREFIX        npm prefix for the pinned buf (default /tmp/geomatch-buf)
#   BUF_AGAINST_REF   the commit to compare against (default HEAD~1)
#   BUF_REQUIRE_BREAKING=1  fail, instead of warning and skipping, when that commit is
#                     not in the clone
set -euo pipefail
cd "$(dirname "$0")/.."

BUF_VERSION=1.75.0
prefix=${BUF_PREFIX:-/tmp/geomatch-buf}
against_ref=${BUF_AGAINST_REF:-HEAD~1}

if [ -n "${BUF:-}" ]; then
    buf=$BUF
elif command -v buf >/dev/null 2>&1 && [ "$(buf --version 2>/dev/null)" = "$BUF_VERSION" ]; then
    buf=$(command -v buf)
else
    buf=$prefix/node_modules/.bin/buf
    if [ ! -x "$buf" ] || [ "$("$buf" --version 2>/dev/null)" != "$BUF_VERSION" ]; then
        if ! command -v npm >/dev/null 2>&1; then
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
        fi
        echo "installing buf $BUF_VERSION into $prefix (npm @bufbuild/buf)"
        mkdir -p "$prefix"
        npm install --silent --no-audit --no-fund --no-save --prefix "$prefix" \
            "@bufbuild/buf@$BUF_VERSION"
    fi
fi
echo "buf $("$buf" --version)"

echo "== buf lint"
"$buf" lint
echo "lint: ok"

echo "== buf breaking (FILE) against $against_ref"
# buf clones the local repository (it needs the commit's objects, not the remote) and
# checks out the commit. The input is the proto/ directory of that commit
# (subdir=proto), not the repository root: a commit from before buf.yaml existed would
# otherwise be read as one module rooted at the repository, its file paths
# (proto/geomatch/...) never matching the module's (geomatch/...), and every file would
# look deleted.
against=$(git rev-parse --verify --quiet "$against_ref^{commit}" || true)
if [ -z "$against" ] && [ "$(git rev-parse --is-shallow-repository)" = true ]; then
    echo "$against_ref is not in this shallow clone: git fetch --deepen=1"
    git fetch --quiet --deepen=1 || echo "git fetch --deepen=1 failed"
    against=$(git rev-parse --verify --quiet "$against_ref^{commit}" || true)
fi
if [ -z "$against" ]; then
    msg="$against_ref is not in this clone (a shallow clone, or the first commit)"
    if [ "${BUF_REQUIRE_BREAKING:-0}" = 1 ]; then
        echo "error: $msg: nothing to run the breaking check against (BUF_REQUIRE_BREAKING=1)" >&2
        exit 1
    fi
    echo "warning: $msg: the breaking check is SKIPPED (lint passed)" >&2
    exit 0
fi
echo "comparing the working tree's proto/ with $(git log -1 --format='%h %s' "$against" | cut -c1-100)"
"$buf" breaking --against ".git#ref=$against,subdir=proto"
echo "breaking: ok (nothing removed, renamed, renumbered or retyped since $against_ref)"
