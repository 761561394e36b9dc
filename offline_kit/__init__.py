"""The offline kit: what lets slmops run and be tested with no internet.

The embedded tiny Phi-3 (`tiny_model`, built deterministically from the Phi-3 family config in
the core), its repos laid out as on the hub (`embedded`), and a loopback fake Hugging Face hub
that serves them (`fake_hub`), so the real `huggingface_hub` code path runs. The kit imports the
core; the core never imports the kit. Flows reach it only through `flows._hubs` (source
`embedded`).
"""
