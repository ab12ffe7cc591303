"""A FastChat-protocol model worker: the HTTP service (`app`) and the vLLM
engine behind it (`engine`). The only part of serving that imports vLLM, and
only inside `engine`'s functions."""
