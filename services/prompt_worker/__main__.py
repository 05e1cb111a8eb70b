from services.prompt_worker.app import main

main()
