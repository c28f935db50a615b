"""The model: loading a pipeline (a Hub id, a local folder or `builtin:`), adding LoRA and exporting LoRAs in the
format stock diffusers pipelines load (`loading.py`)."""
