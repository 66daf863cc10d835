"""Real-parts sandbox: a private Orthanc, phantom DICOM files and a C-STORE sender.

Used by `cxrd demo` and by the integration tests; nothing here runs in production.
"""
