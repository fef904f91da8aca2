from diffuser_api.cli import main

main()
