"""mlora.model"""
