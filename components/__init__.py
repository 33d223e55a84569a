"""Kubeflow Pipelines components: thin wrappers around the stage functions in `spo.stages`."""
