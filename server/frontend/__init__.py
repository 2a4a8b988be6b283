"""The router process's token <-> text side: prompts in (tokenize once, chat templates,
context checks), text out (`server.engine.output_processor`), no model weights."""
