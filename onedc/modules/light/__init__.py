"""The light codec family's modules: the CompressAI hyperprior codec (``model=tiny``, ``sd15``).

Pure torch (docs/architecture.md): it imports the shared blocks of ``onedc.modules``, never the
published model's ``onedc.modules.reference``.
"""
