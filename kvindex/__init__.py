"""Global KV-cache index: SGLang-compatible block hashing, the wire formats, and the prefix index. Pure."""
