"""EchoCare FL coordinator (`echocare-server`): Flower's SuperLink and a ServerApp with our own round loop."""
