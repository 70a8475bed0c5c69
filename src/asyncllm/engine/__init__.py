"""The engine: async face, scheduler, KV-block manager and model runner."""
