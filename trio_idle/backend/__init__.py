"""Talking to the backend: the one HTTP client of every caller (`client`) and its HTTP/1.1
transport (`http_transport`), the scan webhook (`webhook`), whether the backend answers
(`watch`)."""
