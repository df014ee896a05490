# Shared by scripts/demo and scripts/test (sourced, not run): make .venv hold what they need.
#
# Idempotent: what was installed is recorded in .venv/.neuroscope-setup (the inputs: pyproject.toml,
# the extras, the torch pin, the Python version). A run whose inputs match reuses .venv as it is;
# a changed pyproject.toml or extra installs again, on top. Delete .venv to start from scratch.
#
# Written for bash 3.2 too (macOS): empty arrays are expanded as ${a[@]+"${a[@]}"}.
#
# Environment:
#   PYTHON           the Python that creates .venv (default python3; 3.10 or newer)
#   TORCH_INDEX_URL  where torch comes from, e.g. https://download.pytorch.org/whl/cpu on a Linux
#                    machine without an NVIDIA GPU (PyPI's Linux torch brings CUDA, gigabytes)
#   NEUROSCOPE_PIP   the pip command (default: .venv/bin/python -m pip); the tests put a recorder here

TORCH_PIN="torch==2.13.0"  # the version CI tests; installed first so that no extra can move it
VENV=.venv

say() { printf '%s\n' "$*" >&2; }

platform_backend() {
    # Apple Silicon runs the MLX backend; everything else runs torch (CUDA if present, else CPU).
    if [ "$(uname -s)" = Darwin ] && [ "$(uname -m)" = arm64 ]; then echo mlx; else echo torch; fi
}

setup_venv() {  # setup_venv EXTRAS [EXTRA PACKAGES INSTALLED WITH --no-deps...] -- [MORE PACKAGES...]
    local extras=$1
    shift
    local python=${PYTHON:-python3}
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        say "Neuroscope needs Python 3.10 or newer; '$python' is not. Set PYTHON=/path/to/python3.11."
        return 1
    fi
    local want
    want=$(
        {
            cat pyproject.toml
            echo "extras=$extras torch=$TORCH_PIN backend=$(platform_backend) index=${TORCH_INDEX_URL:-}"
            echo "packages=$*"
            "$python" -c 'import sys; print(sys.version)'
        } | "$python" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'
    )
    if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.neuroscope-setup" 2>/dev/null)" = "$want" ]; then
        say "Reusing $VENV (set up for .[$extras]; delete $VENV to reinstall)."
        return 0
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        say "Creating $VENV with $("$python" --version 2>&1)..."
        "$python" -m venv "$VENV"
    fi
    local pip=${NEUROSCOPE_PIP:-"$VENV/bin/python -m pip"}
    $pip install --quiet --upgrade pip
    local pin=()  # torch goes along with every later install, so that no dependency can move it
    if [[ ",$extras," == *",torch,"* ]]; then
        pin=("$TORCH_PIN")
        say "Installing $TORCH_PIN..."
        if [ -n "${TORCH_INDEX_URL:-}" ]; then
            $pip install --quiet "$TORCH_PIN" --index-url "$TORCH_INDEX_URL"
        else
            $pip install --quiet "$TORCH_PIN"
        fi
    fi
    say "Installing Neuroscope from this clone, with .[$extras]..."
    $pip install --quiet -e ".[$extras]" ${pin[@]+"${pin[@]}"}
    local no_deps=() more=() seen_dash=0 package
    for package in "$@"; do
        if [ "$package" = -- ]; then seen_dash=1; elif [ $seen_dash = 0 ]; then no_deps+=("$package"); else more+=("$package"); fi
    done
    if [ ${#no_deps[@]} -gt 0 ]; then
        say "Installing ${no_deps[*]} (without dependencies)..."
        $pip install --quiet --no-deps "${no_deps[@]}"
    fi
    if [ ${#more[@]} -gt 0 ]; then
        say "Installing ${more[*]}..."
        $pip install --quiet "${more[@]}" ${pin[@]+"${pin[@]}"}
    fi
    echo "$want" > "$VENV/.neuroscope-setup"
}
