"""TorchServe handler for prvr: a thin shell, all logic lives in ``prvr.serving``.

``initialize`` loads the checkpoint, text encoder and video index from the archive
(and registers the custom metrics once); ``handle`` answers a whole batch, one
response and one HTTP status per request.
"""
from ts.torch_handler.base_handler import BaseHandler

from prvr.serving import TorchServeService


class PRVRHandler(BaseHandler):
    def initialize(self, context):
        self.context = context
        self.service = TorchServeService.from_context(context)
        self.initialized = True

    def handle(self, data, context):
        return self.service.handle(data, context)
