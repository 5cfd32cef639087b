"""One module per `hf-fam` command; see hf_fam/cli/main.py."""
