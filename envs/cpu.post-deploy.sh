#!/usr/bin/env bash
# Installs holopipe itself into a conda env that Snakemake has just created from envs/cpu.yaml or envs/gpu.yaml
# (gpu.post-deploy.sh links here); Snakemake runs it inside that env. Editable, so source edits reach the env;
# --no-deps and --no-build-isolation, so pip uses the env's conda packages and never pulls a second torch.
#
# Snakemake copies this script next to the env (.snakemake/conda/<hash>_.post-deploy.sh) before running it,
# so its own folder is not always the repository. The repository is, in order: $HOLOPIPE_REPO if set; the
# folder above this script (run in place, e.g. by hand in an activated env); the working directory (Snakemake's,
# the repository when snakemake runs from it). A candidate counts when its pyproject.toml names holopipe.

# Older Snakemake runs it with `sh`, which may be dash (no pipefail): go on under bash.
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -euo pipefail

is_holopipe_repo() {
    [[ -f "$1/pyproject.toml" ]] && grep -Eq '^name *= *"holopipe"' "$1/pyproject.toml"
}

if [[ -n "${HOLOPIPE_REPO:-}" ]]; then
    repo="$HOLOPIPE_REPO"
    if ! is_holopipe_repo "$repo"; then
        echo "$0: HOLOPIPE_REPO=$repo has no pyproject.toml naming holopipe; point it at the holopipe repository" >&2
        exit 1
    fi
else
    repo=""
    for candidate in "$(cd "$(dirname "$0")/.." && pwd)" "$PWD"; do
        if is_holopipe_repo "$candidate"; then
            repo="$candidate"
            break
        fi
    done
    if [[ -z "$repo" ]]; then
        echo "$0: cannot find the holopipe repository: no pyproject.toml naming holopipe in" \
            "$(cd "$(dirname "$0")/.." && pwd) or $PWD; run snakemake from the repository or set HOLOPIPE_REPO" >&2
        exit 1
    fi
fi

echo "Installing holopipe from $repo into $(python -c 'import sys; print(sys.prefix)')"
python -m pip install --no-deps --no-build-isolation --no-input --disable-pip-version-check -e "$repo"
