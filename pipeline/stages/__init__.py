"""The ingestion stages in the order pipeline/run.py chains them: read_input → dedup (URLs) → download
(img2dataset through fetch) → filter (captions: captions.py; images) → dedup (content) → reshard → summary."""
