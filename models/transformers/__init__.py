"""Mid-fusion transformers (EMT, MBT, UMT, CA) for OLM-Trans; see build.py."""
