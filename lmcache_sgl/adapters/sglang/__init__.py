"""SGLang integration: --enable-lmcache."""
