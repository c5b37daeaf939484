#!/bin/bash
# properties = {properties}
# A holopipe PBS job (Snakemake fills in the line above and the step below). PBS starts a job in $HOME with
# a bare environment, so: return to the directory the workflow was submitted from, load the software that
# env.sh (in this profile) names, then run this job's Snakemake step.
set -eo pipefail
cd "${{PBS_O_WORKDIR:?is not set: this script is meant to run under PBS}}"
source "${{HOLOPIPE_PBS_ENV:?is not set: submit through profiles/pbs/pbs-submit.py}}"
{exec_job}
