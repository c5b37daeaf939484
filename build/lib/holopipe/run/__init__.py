"""Running holopipe: the command line (each stage's declared files, whence its provenance record and its rule's
command), the workflow's cost model (resources), the Snakemake report, the README's config reference."""
