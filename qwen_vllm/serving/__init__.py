"""The serving stack: a FastChat-protocol controller, vLLM workers, the OpenAI
gateway and the web UI, supervised by Ray. Only the worker imports vLLM."""
