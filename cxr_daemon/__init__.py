"""cxrd: a chest X-ray AI orchestrator for Orthanc."""

__version__ = "0.1.0"
