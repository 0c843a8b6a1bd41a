"""The modules behind `weights.py`, one concern each.

- `config`: the settings (cache, download bounds, hosts, tokens) and the environment read for them.
- `redact`: what in a URL or a message is a credential, and how to show it without one.
- `refs`: what a pasted LoRA string points to, read without any network request.
- `transfer`: how bytes arrive (pget where installed, else one HTTP stream), with retries.
- `huggingface`, `civitai`, `resolve`: each host's way from a reference to an immutable key.
- `cache`: what is kept (the LRU cache, its index and its locks).

Nothing here imports the engine's models: the engine receives a store, it never imports one.
"""
