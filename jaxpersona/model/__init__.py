"""Model as data: the frozen config, parameter shapes and logical axes, the pure forward, LoRA math,
sharding rules, checkpoint loaders (HF directories, GGUF) and the registry of packaged models."""
