"""Two demo LoRA adapters for the default model (`allcaps`, `json`) and the script that trains them."""
