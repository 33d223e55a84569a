"""The Kubeflow pipeline (DAG) and its compile / submit / local-run command line."""
