"""mlora.config"""
