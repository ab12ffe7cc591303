"""Chat formats shared by the model plugin and the control plane.

Pure Python: the gateway and web UI import this package, so nothing here may
import vLLM, torch or transformers.
"""
