"""prvr: Partially Relevant Video Retrieval with MS-SL++, from feature files to a served endpoint."""

__version__ = "0.1.0"
