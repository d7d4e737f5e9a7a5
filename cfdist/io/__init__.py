"""Reading raw structure files: every input format the preprocessor and ``cfdist predict`` accept.

    readers.py     formats, planning of deterministic chunks (driver), reading a chunk (worker)
    json_scan.py   element boundaries of a JSON list without decoding it (streamed planning)
"""
