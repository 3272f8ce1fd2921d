"""fastlora's built-in pattern library: one file per pattern family.

Each module registers its patterns with ``fastlora.register_pattern`` when imported; the backend
imports every module here the first time it runs. Read ``rms_norm.py`` first: it is the model
for a pattern file (spellings as plain PyTorch functions, a check, a replacement).
"""
