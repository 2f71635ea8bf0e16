"""EchoCare FL hospital side (`echocare-client`): a supervised Flower SuperNode and the ClientApp it runs."""
