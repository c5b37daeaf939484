# Sourced by every holopipe PBS job on its compute node (jobscript.sh), before the job's Snakemake step:
# it must put the `holopipe` command on PATH. Edit it for your site, for example with one of
#   module load conda && conda activate holopipe          # a conda env where `pip install -e .` was run
#   source /glade/work/$USER/holopipe/.venv/bin/activate  # the venv that `make setup` built
# With `--software-deployment-method conda` Snakemake activates each rule's env itself; nothing is needed.
#
# As shipped it reuses the environment the workflow was submitted from: pbs-submit.py passes the directory
# of the `holopipe` command it found on PATH as HOLOPIPE_BIN. That is right whenever the directory sits on a
# file system the compute nodes share (GLADE on Casper and Derecho).
if [ -n "${HOLOPIPE_BIN:-}" ]; then
    export PATH="$HOLOPIPE_BIN:$PATH"
fi
if ! command -v holopipe >/dev/null 2>&1; then
    echo "profiles/pbs/env.sh: warning: no holopipe command on PATH on $(hostname); rules that need it will" \
         "fail unless Snakemake deploys conda envs (edit env.sh to load your environment)" >&2
fi
