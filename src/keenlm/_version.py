"""The package version, in a leaf module so that low layers can read it without importing keenlm."""
__version__ = "0.1.0"
