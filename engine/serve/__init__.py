"""``python -m engine serve``: Tinker's HTTP protocol over this engine, so the real ``tinker``
SDK (0.38) drives it with only ``base_url`` changed. Optional extra: ``pip install 'engine[serve]'``.

The path of one ``forward_backward``, hop by hop:

1. The SDK posts the chunk as ``application/x-protobuf`` (app.py). ``Service.forward_backward``
   (service.py) decodes it (wire.py), files a future (futures.py ``Futures``) and answers its
   request id at once, whatever the order of arrival.
2. The run's ``SeqQueue`` starts it when every lower ``seq_id`` of that training client has
   ended: ``TrainingModel.forward_backward`` on the trainer's thread, awaited on the loop.
3. Its output is encoded once as a ``ForwardBackwardOutput`` protobuf into the future.
4. The SDK long-polls ``retrieve_future``: ``try_again`` while pending, then the bytes (or
   ``{"error", "category"}``).

Sampling is the same without the queue: ``asample`` -> ``InferenceModel.sample`` of the base
(sharing the trainers' base weights) with the session's adapter folder -> ``SampleResponse``
protobuf. Checkpoints are ``tinker://`` URIs inside ``--checkpoint-dir`` (checkpoints.py).
"""
from .app import build_app, serve
from .service import Service

__all__ = ["Service", "build_app", "serve"]
