"""mlora.schedule"""
