#!/usr/bin/env python3
"""Generate train_prompts.jsonl: diverse prompts for draft-model distillation.

Deterministic (random.Random(0)), stdlib only. Combines ~380 fully hand-written
prompts with hand-written templates x hand-written slot lists, de-duplicates,
drops anything identical to a benchmark prompt (bench_prompts.jsonl), shuffles.

Usage: python3 make_train_prompts.py   (writes train_prompts.jsonl next to it)
"""
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "train_prompts.jsonl")
BENCH = os.path.join(HERE, "bench_prompts.jsonl")

# ---------------------------------------------------------------------------
# 1. Fully hand-written prompts, grouped by kind.
# ---------------------------------------------------------------------------
HAND = {
    "science": [
        "What makes a rainbow appear in the sky?",
        "Why does ice float on water?",
        "How do bees make honey?",
        "Why do leaves change color in autumn?",
        "What is the difference between a virus and a bacterium?",
        "How does the heart pump blood around the body?",
        "Why is the ocean salty?",
        "What causes thunder?",
        "How do birds know where to fly in winter?",
        "Why do we sneeze?",
        "What is gravity, in simple words?",
        "Why does the Moon change shape during the month?",
        "How do magnets work?",
        "What happens to water when it boils?",
        "Why do cats purr?",
        "How long does light from the Sun take to reach Earth?",
        "Why do onions make people cry?",
        "What is an echo?",
        "How do fish breathe underwater?",
        "Why is grass green?",
        "What are clouds made of?",
        "How do earthquakes happen?",
        "Why do some animals sleep through the winter?",
        "What does the liver do?",
        "Why do stars twinkle?",
    ],
    "everyday": [
        "How often should I water a cactus?",
        "What is a good way to keep bread fresh longer?",
        "How can I stop my glasses from fogging up?",
        "What should I do if my phone gets wet?",
        "How do I choose a ripe avocado?",
        "Is it better to shower in the morning or at night?",
        "How can I make my small apartment feel bigger?",
        "What is the best way to clean a cast iron pan?",
        "How long can cooked rice stay in the fridge?",
        "How do I get rid of fruit flies in my kitchen?",
        "What can I do on a rainy weekend at home?",
        "How do I fold a fitted sheet?",
        "How can I wake up earlier without feeling tired?",
        "What is a simple way to organize my closet?",
        "How do I know if an egg is still fresh?",
        "Why does my homemade bread not rise?",
        "How can I keep my houseplants alive while I am on vacation?",
        "What should I keep in a basic first aid kit?",
        "How do I remove a sticker from glass?",
        "How can I make my morning routine faster?",
        "What is the best way to pack a suitcase?",
        "How do I unclog a bathroom sink?",
        "How can I save money on groceries?",
        "What should I do if I lock myself out of my house?",
        "How do I tie a tie?",
    ],
    "history": [
        "Why did the Roman Empire fall?",
        "Who built the Great Wall of China, and why?",
        "What was the Industrial Revolution?",
        "Who was Cleopatra?",
        "Why is the year 1492 famous?",
        "What was the Renaissance?",
        "How did people send messages before telephones?",
        "Who invented the printing press, and why was it important?",
        "What was the Silk Road?",
        "Why did the Titanic sink?",
        "Who were the Vikings?",
        "What was the Cold War, in simple terms?",
        "When did humans first learn to write?",
        "Who was Marie Curie?",
        "What was life like in a medieval castle?",
        "How long did it take to build the pyramids of Giza?",
        "What did the Wright brothers do?",
        "Who was Mahatma Gandhi?",
        "What was the Bronze Age?",
        "Why did people start farming thousands of years ago?",
    ],
    "geography": [
        "What is the largest desert in the world?",
        "Which country has the most people?",
        "What is the tallest mountain in Africa?",
        "Name the seven continents.",
        "Why is Iceland called the land of fire and ice?",
        "What is the smallest country in the world?",
        "Which ocean is the largest?",
        "What are the main rivers of Europe?",
        "Where is the Amazon rainforest?",
        "What is the capital of Australia?",
        "Why are there so many lakes in Finland?",
        "What is a fjord?",
        "Which countries share a border with Germany?",
        "What is the equator?",
        "Why is the Dead Sea called dead?",
    ],
    "tech": [
        "What is the cloud, in computing?",
        "How does Wi-Fi work?",
        "What is the difference between RAM and storage?",
        "How can I make a strong password?",
        "What is a web browser?",
        "Why does my computer get slow over time?",
        "What is an app?",
        "How does GPS know where I am?",
        "What is a QR code?",
        "What is two-factor authentication and why should I use it?",
        "How do I take a screenshot on a computer?",
        "What is a computer virus?",
        "How does a search engine find web pages?",
        "What is Bluetooth used for?",
        "What does a CPU do?",
        "What is an email attachment?",
        "Why should I back up my files?",
        "What is a spreadsheet used for?",
        "What is a pixel?",
        "How can I tell if an email is a scam?",
    ],
    "coding": [
        "What is a variable in programming?",
        "What is the difference between a list and a tuple in Python?",
        "How do I read a text file line by line in Python?",
        "What does the return keyword do in a Python function?",
        "Write a Python function that checks if a number is even.",
        "What is a for loop? Give a short example in Python.",
        "How do I reverse a string in Python?",
        "What is a dictionary in Python?",
        "Explain what a bug is in programming.",
        "Write a Python function that returns the largest number in a list.",
        "What is the difference between = and == in Python?",
        "How do I install a package with pip?",
        "What is an if statement?",
        "Write a Python program that prints the numbers from 1 to 10.",
        "What is recursion? Give a simple example.",
        "What does HTML stand for, and what is it used for?",
        "What is the difference between HTML and CSS?",
        "How do I comment out a line in Python?",
        "What is an error message, and how should I read it?",
        "Write a Python function that counts the vowels in a word.",
        "What is JSON?",
        "Explain what this code does: print(len(\"hello\"))",
        "Explain what this code does: nums = [1, 2, 3]; print(sum(nums) / len(nums))",
        "Why is my Python code giving an IndentationError?",
        "What is a function, and why do programmers use them?",
    ],
    "health": [
        "How much water should I drink each day?",
        "Why is breakfast important?",
        "What are some easy stretches to do at my desk?",
        "How can I stop feeling sleepy after lunch?",
        "What foods are high in protein?",
        "Why is it important to wash my hands?",
        "How can I protect my skin from the sun?",
        "What are some simple ways to reduce stress?",
        "How can I build a habit of exercising?",
        "Why do muscles feel sore after exercise?",
        "What is a balanced meal?",
        "How can I take care of my eyes when I use a computer all day?",
        "Is it okay to exercise every day?",
        "Why is fiber good for you?",
        "What are healthy snacks for kids?",
    ],
    "cooking": [
        "How do I cook rice on the stove?",
        "What is a simple recipe for pancakes?",
        "How do I boil an egg so the yolk stays soft?",
        "What can I make for dinner with pasta, tomatoes, and garlic?",
        "How do I make a basic salad dressing?",
        "What is the difference between baking soda and baking powder?",
        "How do I know when chicken is fully cooked?",
        "How can I make soup taste better?",
        "What spices go well with roasted vegetables?",
        "How do I make scrambled eggs fluffy?",
        "Give me an easy idea for a vegetarian lunch.",
        "How do I store fresh herbs?",
        "What can I use instead of eggs in baking?",
        "How do I make a good cup of tea?",
        "What is a quick dessert I can make in ten minutes?",
    ],
    "finance": [
        "What is a budget, and how do I make one?",
        "What is the difference between a debit card and a credit card?",
        "Why should I have an emergency fund?",
        "What is interest on a loan?",
        "How can I start saving money if I do not earn much?",
        "What does it mean to invest?",
        "What is inflation, in simple words?",
        "How can I avoid impulse buying?",
        "What is a savings account?",
        "Should I pay off debt or save money first?",
        "What is a pension?",
        "How do I split a bill fairly with roommates?",
    ],
    "creative": [
        "Write a short poem about the first day of spring.",
        "Write a four-line poem about a lost umbrella.",
        "Write a short story about a dog who wants to fly.",
        "Describe a busy market in the morning.",
        "Write a haiku about the ocean.",
        "Write a funny short poem about a sleepy cat.",
        "Write a short bedtime story about a shy star.",
        "Describe the smell of fresh bread.",
        "Write a story opening about a door that appears in a forest.",
        "Write a short poem about friendship.",
        "Write a slogan for a lemonade stand.",
        "Write a short description of a cozy cabin in the mountains.",
        "Write a limerick about a frog who loves to sing.",
        "Write a short poem about the night sky.",
        "Write a story in three sentences about a lost key.",
        "Describe a thunderstorm to someone who has never seen one.",
        "Write a short poem for my mom's birthday.",
        "Write a short fable with a moral about patience.",
        "Write a motivational quote about learning.",
        "Write a short poem about coffee.",
        "Write a short story about a robot who finds a flower.",
        "Describe a quiet beach at sunset.",
        "Write a riddle about the moon.",
        "Write a short poem about autumn leaves.",
        "Write the first line of a mystery novel.",
        "Write a short dialogue between a cat and a mouse.",
        "Write a short poem about a train ride.",
        "Write a product description for a handmade wooden spoon.",
        "Write a short song chorus about summer holidays.",
        "Write a tiny story about a snowman who does not want to melt.",
    ],
    "email": [
        "Write a short email to my teacher saying I will miss class tomorrow because I am sick.",
        "Write a polite email to my landlord asking him to fix a leaking faucet.",
        "Write a short thank-you email after a job interview.",
        "Write a letter to my grandmother telling her about my new school.",
        "Write an email to a coworker asking to move our meeting to Thursday.",
        "Write a short message congratulating a friend on her new job.",
        "Write an email to a customer apologizing for a late delivery.",
        "Write a short note to my neighbor asking them to keep the music down at night.",
        "Write an email inviting the team to lunch on Friday.",
        "Write a short letter to a pen pal introducing yourself.",
        "Write an email asking a store for a refund for a broken lamp.",
        "Write a short out-of-office reply for a vacation.",
        "Write a welcome message for a new member of our book club.",
        "Write a short email reminding my friends about the party on Saturday.",
        "Write a letter of complaint about a noisy construction site near my home.",
    ],
    "advice": [
        "I feel nervous speaking in front of my class. What can I do?",
        "How can I make new friends after moving to a new city?",
        "I keep forgetting things. How can I improve my memory?",
        "How can I stop spending so much time on my phone?",
        "My roommate never cleans up. How can I talk to them about it?",
        "How do I stay motivated when studying alone?",
        "What should I do if I feel lonely?",
        "How can I be a better listener?",
        "I have too many tasks and feel overwhelmed. Where should I start?",
        "How can I prepare for my first day at a new job?",
        "What is a good way to apologize to a friend?",
        "How can I become more confident?",
        "How can I eat a plant-based diet on a budget?",
        "How can I help my child enjoy reading?",
        "What should I think about before getting a dog?",
    ],
    "math": [
        "If a shirt costs 20 dollars and is on sale for 25 percent off, what is the sale price?",
        "What is 15 percent of 80?",
        "A car travels 60 kilometers in one hour. How far does it go in three and a half hours?",
        "Anna is 4 years older than her brother. Her brother is 9. How old will Anna be in 5 years?",
        "What is the average of 4, 8, and 12?",
        "If I have 3 quarters and 4 dimes, how much money do I have?",
        "A recipe needs 2 cups of flour for 12 cookies. How much flour do I need for 30 cookies?",
        "What is the next number in the pattern 2, 4, 8, 16?",
        "How many minutes are in 3 hours?",
        "A garden is 5 meters by 7 meters. What is its area?",
        "Convert 3 kilometers into meters.",
        "If a movie starts at 7:40 PM and lasts 95 minutes, when does it end?",
        "What is one half plus one quarter?",
        "A bag has 5 red balls and 3 blue balls. What fraction of the balls are blue?",
        "Is 91 a prime number? Explain.",
        "Jake runs 2 kilometers every morning. How far does he run in 30 days?",
        "What is 7 times 8?",
        "A class of 30 students has 18 girls. What percentage of the class are boys?",
        "Round 3.476 to one decimal place.",
        "If three notebooks cost 12 dollars, how much do five notebooks cost?",
    ],
    "fill_in": [
        "Fill in the blank: The opposite of hot is ___.",
        "Fill in the blank: A baby cat is called a ___.",
        "Complete the sentence: On rainy days, I like to ...",
        "Fill in the blank: Water freezes at ___ degrees Celsius.",
        "Complete the saying: An apple a day ...",
        "Fill in the blank: The Sun rises in the ___.",
        "Fill in the blank with the correct form of the verb: She ___ (go) to school every day.",
        "Complete the sentence: The best thing about summer is ...",
        "Fill in the missing word: Birds of a feather flock ___.",
        "Fill in the blank: There are ___ days in a week.",
        "Complete this sentence in a funny way: My dog thinks he is ...",
        "Fill in the blank: The plural of \"mouse\" is ___.",
        "Fill in the blank with \"a\" or \"an\": I ate ___ orange for breakfast.",
        "Complete the analogy: Bird is to sky as fish is to ___.",
        "Fill in the blank: The largest planet in our solar system is ___.",
    ],
    "classify": [
        "Is a tomato a fruit or a vegetable?",
        "Classify these animals as mammals or birds: eagle, whale, bat, penguin, dog.",
        "Is this sentence a question or a statement: \"The store closes at six.\"",
        "Sort these words into fruits and vegetables: carrot, apple, spinach, banana, potato, grape.",
        "Is the following review positive or negative? \"The food was cold and the waiter was rude.\"",
        "Is the following review positive or negative? \"I loved this book and could not put it down.\"",
        "Which of these is not a color: red, blue, table, green?",
        "Classify these as living or non-living: tree, rock, mushroom, cloud, ant.",
        "Is \"quickly\" a noun, verb, adjective, or adverb?",
        "Which of these is a mammal: shark, dolphin, or salmon?",
        "Sort these numbers into even and odd: 3, 8, 11, 14, 21, 30.",
        "What is the mood of this sentence: \"I can't wait for the trip tomorrow!\"",
        "Is this email spam or not spam? \"Congratulations! You won a free cruise. Click here to claim your prize now.\"",
        "Group these into hot and cold drinks: iced tea, hot chocolate, lemonade, coffee, milkshake.",
        "Is a spider an insect? Explain briefly.",
    ],
    "roleplay": [
        "Pretend you are a tour guide in Paris. Welcome me to the city.",
        "You are a friendly librarian. I am looking for a good mystery book. What do you suggest?",
        "Act as a chef and tell me about today's special dish.",
        "Pretend you are a pirate and describe your ship.",
        "You are a personal trainer. Give me a quick warm-up before a run.",
        "Pretend you are a weather reporter and give the forecast for a sunny day.",
        "Act as a shopkeeper in a toy store and greet a child who walks in.",
        "You are a wise old owl. Give me advice about making decisions.",
        "Pretend you are an astronaut on the Moon. Describe what you see.",
        "Act as a museum guide and introduce a painting of a sunflower field.",
        "You are a customer service agent. I ordered shoes in the wrong size. Please help me.",
        "Pretend you are a detective and describe the first clue you found.",
    ],
    "rewrite": [
        "Rewrite this sentence to be more polite: \"Give me the report now.\"",
        "Make this sentence shorter: \"Due to the fact that it was raining, we made the decision to stay inside the house.\"",
        "Rewrite this in simple English: \"The meeting has been postponed until further notice.\"",
        "Correct the grammar in this sentence: \"She don't like apples.\"",
        "Rewrite this sentence in the past tense: \"I walk to the park and play with my dog.\"",
        "Make this sentence sound more exciting: \"We went to the zoo.\"",
        "Paraphrase this sentence: \"The movie was very long but interesting.\"",
        "Fix the spelling: \"I recieved your mesage yesterday.\"",
        "Rewrite this sentence to be more formal: \"Hey, can you send me that file?\"",
        "Turn this sentence into a question: \"The train leaves at noon.\"",
        "Rewrite this sentence in the passive voice: \"The chef cooked the meal.\"",
        "Make this text friendlier: \"Your request has been denied.\"",
        "Combine these two sentences into one: \"It was cold. We wore our coats.\"",
        "Rewrite this sentence without using the word \"very\": \"The cake was very good.\"",
        "Correct the punctuation: \"lets eat grandma\"",
    ],
    "translation": [
        "Translate into English: \"Je suis content de te voir.\"",
        "Translate into English: \"¿Dónde está el baño?\"",
        "Translate into English: \"Guten Morgen, wie geht es dir?\"",
        "Translate into English: \"Nous allons au marché demain.\"",
        "Translate into English: \"Me gusta mucho la música.\"",
        "Translate into English: \"Das Wetter ist heute schön.\"",
        "What does \"merci beaucoup\" mean in English?",
        "How do you say \"good night\" in Spanish?",
        "How do you say \"thank you\" in German?",
        "What does the Spanish word \"hola\" mean?",
    ],
    "trivia": [
        "How many legs does a spider have?",
        "What is the fastest land animal?",
        "How many players does a soccer team have on the field?",
        "What is the hardest natural substance?",
        "Which planet is known as the Red Planet?",
        "What is the largest mammal in the world?",
        "How many bones are in the adult human body?",
        "Which language has the most native speakers?",
        "Who painted the Mona Lisa?",
        "What is the boiling point of water in Fahrenheit?",
        "What is the main gas in the air we breathe?",
        "How many strings does a standard guitar have?",
        "Which bird is a symbol of peace?",
        "What is the largest organ of the human body?",
        "How many hours are in a week?",
    ],
    "nature": [
        "Why do birds sing in the morning?",
        "How do trees help the environment?",
        "What is a food chain?",
        "Why are coral reefs important?",
        "How do caterpillars turn into butterflies?",
        "Why do some trees lose their leaves in winter?",
        "What is the difference between a frog and a toad?",
        "How do mushrooms grow?",
        "Why are bees important for farming?",
        "What animals live in the Arctic?",
        "How do rivers form?",
        "What is a rainforest?",
    ],
    "sports": [
        "How is a tennis match scored?",
        "What is the offside rule in soccer, in simple words?",
        "How long is a marathon?",
        "What are good exercises for beginners who want to start running?",
        "How many rings are on the Olympic flag, and what do they mean?",
        "What is the difference between a sprint and a long-distance race?",
        "Why do swimmers wear caps?",
        "How do you play chess, in short?",
        "What equipment do I need to start playing badminton?",
        "What muscles does cycling work?",
    ],
    "arts": [
        "What is the difference between watercolor and oil paint?",
        "Who was Vincent van Gogh?",
        "How can I start learning to draw?",
        "What is a sonnet?",
        "What makes a good photograph?",
        "What instruments are in an orchestra?",
        "How do I start learning the guitar?",
        "What is jazz music?",
        "What is sculpture?",
        "What is the difference between a novel and a short story?",
    ],
    "travel": [
        "What should I bring on a day hike?",
        "How can I beat jet lag?",
        "What are some tips for traveling on a tight budget?",
        "How early should I arrive at the airport for an international flight?",
        "What should I do if I lose my passport abroad?",
        "How can I learn a few useful words before visiting a new country?",
        "Is it better to travel by train or by plane for short trips?",
        "What are good things to do on a long train ride?",
        "How do I stay safe when traveling alone?",
        "What should I pack for a beach holiday?",
    ],
    "list": [
        "Give me five ideas for a rainy day with kids.",
        "List five healthy breakfast foods.",
        "Name three famous composers.",
        "Give me a list of ten words that rhyme with \"cat\".",
        "List four ways to reduce plastic waste.",
        "Suggest five names for a pet goldfish.",
        "Give me three ideas for a cheap date night.",
        "List five things to do before going to bed.",
        "Give me five conversation starters for a party.",
        "Name five animals that live in the ocean.",
    ],
}

# ---------------------------------------------------------------------------
# 2. Hand-written slot lists for templates.
# ---------------------------------------------------------------------------
CONCEPTS = [
    "photosynthesis", "gravity", "electricity", "the water cycle", "inflation",
    "compound interest", "a black hole", "DNA", "the immune system", "climate change",
    "recycling", "a computer program", "the internet", "artificial intelligence",
    "how vaccines work", "evolution", "atoms", "the solar system", "democracy",
    "supply and demand", "how volcanoes erupt", "the greenhouse effect",
    "renewable energy", "a credit score", "taxes", "how elections work", "friction",
    "sound waves", "magnetism", "the digestive system", "why we need sleep",
    "a food web", "erosion", "ocean tides", "the phases of the Moon", "time zones",
    "percentages", "fractions", "an algorithm", "encryption", "how a battery works",
    "how rainbows form", "the stock market", "insurance", "a mortgage",
    "the speed of light", "static electricity", "how airplanes fly",
    "how the heart works", "germs", "nutrition labels", "a leap year",
    "the metric system", "a solar eclipse", "machine learning", "a carbon footprint",
    "how plants grow from seeds", "the rule of law", "how money is made",
    "how a bill becomes a law",
]
AUDIENCES = [
    "a five-year-old", "a ten-year-old", "a high school student",
    "a complete beginner", "my grandmother",
]

HOWTO_TASKS = [
    "change a flat bicycle tire", "plant tomato seeds", "write a good resume",
    "start a vegetable garden", "make a paper airplane", "clean a laptop keyboard",
    "iron a shirt", "sew a button back on", "brew coffee with a French press",
    "start running as a beginner", "learn to juggle", "set up a fish tank",
    "train a puppy to sit", "make a budget spreadsheet", "study for an exam",
    "wash a wool sweater", "paint a room", "hang a picture on the wall",
    "make a compost pile", "prepare for a job interview", "care for a succulent",
    "write a thank-you card", "plan a road trip", "build a campfire safely",
    "learn to touch type", "bake bread at home", "remove rust from tools",
    "organize my email inbox", "take better photos with my phone",
    "improve my handwriting", "keep a journal", "meditate for five minutes",
    "make a fruit smoothie", "clean windows without streaks", "choose a good watermelon",
    "memorize a short speech", "pitch a tent", "learn a new language on my own",
    "teach a child to ride a bike", "make a simple website", "change a light bulb safely",
    "lower my electricity bill", "make cold brew coffee", "knit a scarf",
    "start a book club", "write a short wedding toast", "get better at chess",
    "make ice cream without a machine", "fall asleep faster", "clean a stainless steel sink",
    "set the table for a dinner party", "get a stain out of a carpet",
    "make friends with a shy cat", "pack a healthy school lunch", "save money for a vacation",
    "back up the photos on my phone", "write a cover letter", "prepare for a long flight",
    "make a paper snowflake", "grow herbs on a windowsill",
]
HOWTO_TEMPLATES = [
    "How do I {t}?",
    "Give me simple step-by-step instructions to {t}.",
    "What are some tips to {t}?",
]

IDEA_THINGS = [
    "a birthday gift for my dad", "a team-building activity at work",
    "a science fair project", "a weekend trip near the city", "a healthy lunch at work",
    "a name for a coffee shop", "a short story", "a new school club",
    "things to do at the beach", "a family game night", "a garden party theme",
    "a small side business", "a blog post about cooking", "an easy craft for kids",
    "a cheap new hobby", "a vegetarian dinner", "a picnic menu", "a homemade costume",
    "using leftover rice", "a fun fitness challenge", "a classroom reward",
    "winter holiday decorations", "a thank-you gift for a teacher", "a podcast topic",
    "a New Year's resolution", "a useful mobile app", "a quiet activity before bed",
    "a song title", "an indoor activity on a snowy day", "a school fundraiser",
    "a surprise for my best friend", "a short weekend project at home",
    "a name for a pet rabbit", "a cozy evening at home", "a road trip playlist theme",
    "a first date", "a kids' birthday party game", "a healthy after-school snack",
    "a community event in my town", "decorating a small bedroom",
]
LIST_ITEMS = [
    "fruits that are high in vitamin C", "famous bridges in the world",
    "tips for saving energy at home", "board games for families",
    "vegetables that grow well in pots", "ways to be kind to others",
    "jobs that involve working with animals", "benefits of reading books",
    "common mistakes when learning to cook", "countries in South America",
    "uses for baking soda", "animals that live in the desert",
    "ways to relax after work", "good habits for students",
    "things to check before a long drive", "inventions that changed the world",
    "types of clouds", "reasons to learn a second language",
    "musical instruments with strings", "signs that a plant needs more water",
    "famous scientists and what they discovered", "ways to stay warm in winter",
    "foods that are rich in iron", "tips for writing a good essay",
    "things to pack for a camping trip",
]

CREATIVE_FORMS = [
    ("poem", "Write a short poem about {s}."),
    ("poem", "Write a haiku about {s}."),
    ("poem", "Write a four-line rhyming poem about {s}."),
    ("story", "Write a very short story about {s}."),
    ("description", "Write a vivid description of {s}."),
]
CREATIVE_SUBJECTS = [
    "a lighthouse in a storm", "a child's first snowfall", "an old bookshop",
    "a sleepy village at dawn", "a hot air balloon ride", "a lost puppy finding its way home",
    "a garden after the rain", "a busy train station", "a grandmother's kitchen",
    "the last day of summer", "a campfire under the stars", "a city at midnight",
    "a fox in the snow", "a rainy Monday morning", "a kite on a windy day",
    "an empty playground", "a treehouse", "the first cup of coffee in the morning",
    "a sailboat on a calm lake", "a mountain at sunrise", "a street market at night",
    "a friendly dragon", "an old clock", "a field of sunflowers",
    "a whale in the deep sea", "a snowy forest", "a bicycle ride by the sea",
    "moving to a new town", "a music box", "a thunderstorm at night",
    "a cat watching birds through a window", "a secret garden", "a paper boat in a puddle",
    "an autumn walk in the park", "a small bakery", "a starry night in the desert",
    "a robot learning to dance", "a library at closing time", "a lonely scarecrow",
    "a farm in the early morning",
]

BUSINESSES = [
    "a bakery", "a bike repair shop", "a dog walking service", "a local bookstore",
    "an ice cream truck", "a yoga studio", "a car wash", "a plant nursery",
    "a music school", "a pizza restaurant", "a house cleaning company", "a coffee shop",
    "a summer camp", "a town recycling program", "a farmers market", "a fitness app",
    "a toy store", "a hair salon", "a language school", "a solar panel company",
    "a hiking club", "a school bake sale", "a pet shelter", "a travel agency",
    "a used furniture shop",
]
BUSINESS_TEMPLATES = [
    "Write a catchy slogan for {b}.",
    "Write a short, friendly advertisement for {b}.",
]

EMAIL_TARGETS = [
    "my manager asking for a day off next week",
    "a client to confirm our meeting on Tuesday",
    "my landlord about a broken heater",
    "my teacher asking for help with the homework",
    "a friend inviting them to dinner at my place",
    "a hotel asking about early check-in",
    "a company asking about a job opening",
    "my team announcing a new project",
    "a customer thanking them for their order",
    "my neighbors about a lost cat",
    "a coworker thanking them for their help",
    "a restaurant to book a table for six",
    "my gym asking to cancel my membership",
    "my doctor's office to change an appointment",
    "a supplier asking about a late order",
    "the parents of my class announcing a field trip",
    "a bookshop asking if a book is in stock",
    "a new colleague welcoming them to the team",
    "a guest speaker thanking them for their talk",
    "a plumber asking for a price quote",
    "a friend apologizing for missing her party",
    "my old teacher to say thank you",
    "my bank asking about a strange charge on my card",
    "the city council about a broken streetlight",
    "a colleague asking for feedback on my report",
]
EMAIL_TONES = ["short", "polite", "friendly"]

REWRITE_SENTENCES = [
    "The store will be closed on Sunday.",
    "I can't come to the meeting because I am busy.",
    "Please remember to turn off the lights.",
    "The new phone is fast and has a great camera.",
    "We need to finish this project by Friday.",
    "The weather was bad, so the game was canceled.",
    "I think we should try a different plan.",
    "The food at the restaurant was good.",
    "My computer is not working again.",
    "Thank you for helping me move last weekend.",
    "The park is a nice place to relax.",
    "Send me the documents when you can.",
    "The bus was late and I missed my class.",
    "This book is about a boy who travels through time.",
    "Our team won the game after a hard match.",
    "I don't understand the homework.",
    "The price of the tickets went up this year.",
    "Please be quiet in the library.",
    "She finished the race even though she was tired.",
    "The museum has many old paintings.",
    "You forgot to sign the form.",
    "We are excited to see you at the party.",
    "The coffee machine is broken.",
    "I want to learn how to cook.",
    "The movie starts at eight, so don't be late.",
]
REWRITE_STYLES = ["more formal", "more friendly", "simpler", "more polite", "more exciting"]

TRANSLATE_SENTENCES = [
    "Good morning, how are you?", "I am learning to cook.", "The weather is nice today.",
    "Where can I buy a ticket?", "My sister lives in a big city.", "We eat dinner at seven.",
    "This soup is very hot.", "I have two cats and a dog.", "The museum is closed on Mondays.",
    "Can you help me, please?", "I like to read before bed.", "The bus stop is near the school.",
    "It is raining, so take an umbrella.", "My favorite color is blue.",
    "We visited our grandparents last summer.", "How much does this shirt cost?",
    "The train is late today.", "I need to buy bread and milk.", "She works at a hospital.",
    "The children are playing in the park.", "I am very tired after work.",
    "Do you speak English?", "Happy birthday, my friend!", "The restaurant opens at noon.",
    "My phone is on the table.", "Tomorrow we will go to the mountains.",
    "I would like a cup of coffee with milk.", "The book is on the shelf.", "What time is it?",
    "Our house has a small garden.", "He plays the piano every evening.",
    "The sky is clear tonight.", "Please speak more slowly.", "I lost my keys.",
    "The market sells fresh fruit.", "Thank you for the lovely gift.",
    "We are going to the cinema tonight.", "My brother is taller than me.",
    "Winter is my favorite season.", "The water in the lake is cold.",
]
LANGUAGES = ["French", "Spanish", "German"]

PY_FUNC_TASKS = [
    "adds two numbers", "returns the square of a number", "checks if a word is a palindrome",
    "counts how many times a letter appears in a string", "returns the smallest number in a list",
    "converts Celsius to Fahrenheit", "checks if a year is a leap year",
    "returns the factorial of a number", "removes duplicates from a list", "reverses a list",
    "returns the sum of all even numbers in a list", "checks if a number is prime",
    "returns the longest word in a sentence", "capitalizes the first letter of each word",
    "counts the words in a sentence", "returns the average of a list of numbers",
    "finds the second largest number in a list", "merges two dictionaries",
    "returns the first n Fibonacci numbers", "checks if two words are anagrams",
    "converts minutes into hours and minutes",
    "returns the numbers from 1 to n that are divisible by 3",
    "sorts a list of names alphabetically", "counts the vowels in a string",
    "checks if a list is empty", "swaps the keys and values of a dictionary",
    "calculates the area of a circle", "joins a list of words into one sentence",
    "finds the most common item in a list", "removes all spaces from a string",
    "returns the last element of a list", "checks if a string contains only digits",
    "converts a number to binary", "doubles every number in a list",
    "returns the number of days in a given month",
]
PY_FUNC_TEMPLATES = [
    "Write a Python function that {t}.",
    "Write a short Python function that {t}, and explain how it works.",
]
CODE_SNIPPETS = [
    "for i in range(5):\n    print(i * 2)",
    "names = ['Ann', 'Bob']\nfor name in names:\n    print('Hello, ' + name)",
    "x = 10\nif x > 5:\n    print('big')\nelse:\n    print('small')",
    "def double(n):\n    return n * 2\n\nprint(double(4))",
    "words = 'the cat sat'.split()\nprint(len(words))",
    "total = 0\nfor n in [3, 5, 7]:\n    total += n\nprint(total)",
    "squares = [n * n for n in range(1, 6)]\nprint(squares)",
    "ages = {'Tom': 30, 'Ana': 25}\nprint(ages['Ana'])",
    "count = 0\nwhile count < 3:\n    print('hi')\n    count += 1",
    "text = 'Hello'\nprint(text.upper())",
    "nums = [4, 1, 3]\nnums.sort()\nprint(nums)",
    "with open('notes.txt') as f:\n    print(f.read())",
    "import random\nprint(random.randint(1, 6))",
    "name = input('Your name: ')\nprint(f'Nice to meet you, {name}!')",
    "evens = [n for n in range(10) if n % 2 == 0]\nprint(evens)",
]
CODE_TEMPLATES = [
    "Explain what this Python code does:\n\n{c}",
    "What will this Python code print? Explain why.\n\n{c}",
]
PY_HOW = [
    "sort a list", "get today's date", "check if a key is in a dictionary",
    "join two strings", "loop over a dictionary", "convert a string to a number",
    "make a random number", "write text to a file", "find the length of a list",
    "split a sentence into words", "round a number to two decimal places",
    "remove an item from a list", "check the type of a variable", "create a class",
    "handle an error with try and except", "import a module", "ask the user for input",
    "format a number as a percentage", "repeat a string several times",
    "count how often an item appears in a list",
]

NAMES = ["Emma", "Liam", "Noah", "Olivia", "Ava", "Lucas", "Mia", "Leo", "Zoe", "Omar",
         "Priya", "Carlos", "Hana", "Sam", "Nina", "Ali", "Grace", "Ben", "Rosa", "Kenji"]
COUNT_OBJECTS = ["marbles", "stickers", "pencils", "books", "seashells", "stamps", "cards"]
BUY_ITEMS = ["notebooks", "apples", "movie tickets", "sandwiches", "plant pots", "pens"]
MATH_SUFFIXES = [" Show your work step by step.", " Explain your answer.",
                 " Think step by step.", ""]

COMPARE_PAIRS = [
    ("tea", "coffee"), ("a laptop", "a tablet"), ("renting a home", "buying a home"),
    ("a lake", "a pond"), ("an ocean", "a sea"), ("a crocodile", "an alligator"),
    ("a violin", "a cello"), ("a hurricane", "a tornado"), ("baking", "frying"),
    ("a city", "a town"), ("a poem", "a song"), ("a hobby", "a job"),
    ("an email", "a letter"), ("jogging", "walking"), ("a comet", "an asteroid"),
    ("a bicycle", "an electric scooter"), ("a president", "a prime minister"),
    ("butter", "margarine"), ("a plant cell", "an animal cell"), ("speed", "velocity"),
    ("a noun", "a verb"), ("a simile", "a metaphor"), ("a desktop computer", "a laptop"),
    ("a river", "a stream"), ("a monkey", "an ape"), ("a rabbit", "a hare"),
    ("a cake", "a muffin"), ("a biography", "an autobiography"), ("saving", "investing"),
    ("a cold", "the flu"), ("cats", "dogs as pets"), ("a bus", "a train for commuting"),
    ("e-books", "paper books"), ("a sweater", "a jacket"), ("a mountain", "a hill"),
]
COMPARE_TEMPLATES = [
    "What is the difference between {a} and {b}?",
    "Compare {a} and {b} in a few sentences.",
]

PROS_CONS = [
    "working from home", "living in a big city", "owning a car", "online shopping",
    "studying abroad", "electric cars", "social media", "homeschooling", "eating out often",
    "having a pet", "using public transport", "taking classes online",
    "getting up very early", "living alone", "renting an apartment", "solar panels",
    "working part-time", "playing video games", "school uniforms", "traveling by train",
    "buying second-hand clothes", "camping", "having a garden", "reading e-books",
    "a four-day work week", "smartphones for children", "fast food",
    "group projects at school", "flying for short trips", "living near the sea",
]
PROS_TEMPLATES = [
    "What are the pros and cons of {x}?",
    "Give me two advantages and two disadvantages of {x}.",
]

WORDS = [
    "curious", "generous", "humble", "brave", "ancient", "fragile", "journey", "harvest",
    "migrate", "abundant", "reluctant", "cozy", "vivid", "persuade", "nostalgia", "empathy",
    "horizon", "invent", "patient", "rare", "enormous", "whisper", "gather", "shelter",
    "volunteer", "cautious", "delightful", "stubborn", "resilient", "tradition", "explore",
    "compliment", "deadline", "routine", "gratitude", "predict", "frugal", "habitat",
]
ADJECTIVES = [
    "curious", "generous", "humble", "brave", "ancient", "fragile", "abundant", "reluctant",
    "cozy", "vivid", "patient", "rare", "enormous", "cautious", "delightful", "stubborn",
    "resilient", "frugal",
]

ADVICE_SITUATIONS = [
    "I just started a new job and I don't know anyone",
    "I have an exam in three days and I have not studied",
    "My neighbor's dog barks all night",
    "I want to start exercising but I have very little time",
    "I can't decide which college to choose",
    "I spend too much money on takeout food",
    "I feel tired every afternoon",
    "My friend always cancels our plans at the last minute",
    "I want to learn to play the piano as an adult",
    "I am moving to a new country next month",
    "I have trouble saying no to people",
    "My kids fight over the TV every evening",
    "I want to read more books this year",
    "I keep putting off big projects",
    "My garden plants keep dying",
    "I get bored easily at work",
    "I am nervous about my driving test",
    "I want to eat less sugar",
    "My team at work does not communicate well",
    "I want to volunteer but I don't know where to start",
    "I forgot my best friend's birthday",
    "My laptop battery runs out very quickly",
    "I feel stressed before every flight",
    "I want to make my home more eco-friendly",
    "My teenager does not want to talk to me",
]
ADVICE_TEMPLATES = ["{s}. What should I do?", "{s}. Can you give me some advice?"]

ANIMALS = [
    "dolphins", "elephants", "owls", "octopuses", "giraffes", "penguins", "bees", "wolves",
    "sea turtles", "kangaroos", "pandas", "hedgehogs", "eagles", "bats", "camels",
    "polar bears", "frogs", "sharks", "butterflies", "ants", "horses", "parrots", "tigers",
    "snails", "crows", "foxes", "otters", "zebras", "squirrels", "jellyfish",
]
ANIMAL_TEMPLATES = [
    "Tell me three interesting facts about {a}.",
    "Where do {a} live, and what do they eat?",
]
CLASSIFY_ANIMALS = [
    "a salmon", "a lizard", "a robin", "a bat", "a beetle", "a whale", "a snake", "an owl",
    "a tuna", "a ladybug", "a turtle", "a goat", "a crocodile", "a bee", "a seal",
    "a sparrow", "a shark", "a mosquito", "a hamster", "a gecko",
]
REVIEWS = [
    "The hotel room was clean and the staff were very kind.",
    "My package arrived broken and nobody answered my emails.",
    "This blender is loud, but it makes great smoothies.",
    "Best pizza in town. We will definitely come back!",
    "The movie was boring and far too long.",
    "The shoes are comfortable and look great.",
    "I waited an hour for my food and it was cold when it came.",
    "The teacher explained everything clearly. I learned a lot.",
    "The app keeps crashing every time I open it.",
    "Lovely little cafe with friendly service and tasty cake.",
    "The battery dies after only two hours. Very disappointing.",
    "Our tour guide was funny and knew so much about the city.",
    "The jacket fell apart after one wash.",
    "Fast delivery and the plant arrived healthy. Thank you!",
    "The concert sound was terrible and we could barely hear the singer.",
    "This is the most comfortable chair I have ever owned.",
    "The instructions were confusing and parts were missing.",
    "Great value for the price. My kids love this game.",
    "The room smelled of smoke and the bed was uncomfortable.",
    "A beautiful book with a warm, gentle story.",
]

DISHES = [
    "tomato soup", "guacamole", "banana bread", "fried rice", "a simple omelette",
    "lemonade", "chocolate chip cookies", "a vegetable stir-fry", "hummus",
    "mashed potatoes", "a fruit salad", "garlic bread", "a grilled cheese sandwich",
    "chicken noodle soup", "a green smoothie", "oatmeal", "a tuna salad", "a simple curry",
    "homemade pizza", "spaghetti with tomato sauce", "apple crumble", "popcorn on the stove",
    "a bean chili", "French toast", "iced tea", "potato wedges", "rice pudding",
    "a lentil soup", "a vegetable omelette wrap", "carrot cake",
]
DISH_TEMPLATES = [
    "How do I make {d}?",
    "Give me a simple recipe for {d}.",
    "What ingredients do I need for {d}?",
]

CITIES = [
    "Paris", "Tokyo", "Rome", "New York", "Barcelona", "Cairo", "Sydney", "Lisbon",
    "Mexico City", "Istanbul", "Kyoto", "London", "Amsterdam", "Cape Town", "Vancouver",
    "Prague", "Bangkok", "Rio de Janeiro", "Vienna", "Dublin", "Marrakech", "Buenos Aires",
    "Seoul", "Athens", "Edinburgh",
]
CITY_TEMPLATES = [
    "What are some things to do in {p}?",
    "What should I know before visiting {p}?",
    "Plan a simple one-day trip in {p}.",
    "What food should I try in {p}?",
]

COUNTRIES = [
    "Japan", "Brazil", "Kenya", "Norway", "Egypt", "Argentina", "India", "Italy", "Spain",
    "Peru", "Vietnam", "Greece", "Turkey", "Poland", "Chile", "Morocco", "Sweden",
    "Thailand", "Nigeria", "Portugal", "Ireland", "South Korea", "New Zealand", "Mexico",
    "Germany", "Colombia", "Indonesia", "Ghana", "Finland", "Hungary",
]
COUNTRY_TEMPLATES = [
    "What is the capital of {c}?",
    "Tell me a few interesting facts about {c}.",
]

HABITS = [
    "walking every day", "drinking enough water", "eating more vegetables",
    "getting enough sleep", "stretching in the morning", "spending time outdoors",
    "reading before bed", "taking short breaks at work", "cooking at home",
    "writing down things I am grateful for", "swimming", "yoga", "keeping a journal",
    "limiting screen time", "eating breakfast", "cycling to work", "dancing",
    "gardening", "deep breathing", "learning something new",
]
HABIT_DAILY = HABITS[:10]

SPORTS = [
    "soccer", "basketball", "tennis", "volleyball", "baseball", "cricket", "rugby",
    "table tennis", "golf", "ice hockey", "badminton", "handball", "water polo", "curling",
    "field hockey", "American football", "bowling", "squash", "archery", "fencing",
]
SPORT_TEMPLATES = [
    "Explain the basic rules of {s}.",
    "What skills do you need to be good at {s}?",
]

HISTORY_TOPICS = [
    "the first modern Olympic Games", "the invention of the telephone",
    "the building of the Eiffel Tower", "the first Moon landing",
    "the fall of the Berlin Wall", "the invention of paper", "ancient Rome",
    "the history of chocolate", "the first airplane flight", "the discovery of penicillin",
    "the history of the bicycle", "the invention of the light bulb",
    "the history of the internet", "the travels of Marco Polo", "the ancient Maya",
    "the history of coffee", "the invention of the wheel", "the Age of Exploration",
    "the history of tea", "the California Gold Rush",
]

PARAGRAPHS = [
    "Our neighborhood started a book swap box last month. It is a small wooden cabinet "
    "next to the bus stop. People leave books they have finished and take new ones for "
    "free. The box is always full, and many neighbors say they now read more than before.",
    "Tomatoes grow best in warm, sunny places. They need about six to eight hours of sun "
    "each day and regular watering. Gardeners often tie the plants to sticks so the heavy "
    "fruit does not pull them down. Most tomatoes are ready to pick about two months after "
    "planting.",
    "The new city pool opened on Saturday after two years of building. It has a large "
    "swimming area, a small pool for children, and a water slide. Entry is free for kids "
    "under twelve during the first month. Hundreds of families visited on the opening day.",
    "Many people drink coffee to feel more awake. Coffee contains caffeine, which blocks a "
    "chemical in the brain that makes us feel sleepy. One or two cups a day is fine for "
    "most adults, but too much can cause headaches, a fast heartbeat, or trouble sleeping.",
    "Anna wanted to learn to play the guitar. She watched short lessons online every "
    "evening and practiced for twenty minutes a day. Her fingers hurt at first, but after "
    "three months she could play five songs. Now she plays for her family every Sunday.",
    "Owls are birds that hunt mostly at night. Their large eyes help them see in the dark, "
    "and their soft feathers let them fly almost silently. They can turn their heads very "
    "far to look around. Owls eat mice, insects, and other small animals.",
    "The school library will close for two weeks in March for repairs. Workers will fix "
    "the roof and put in new lights and shelves. During this time, students can borrow "
    "books from a small cart in the main hall. The library will reopen with a party.",
    "Electric bikes have a small motor that helps the rider pedal. They make it easier to "
    "climb hills and ride longer distances without getting too tired. Many people now use "
    "them to get to work. However, they cost more than normal bikes and need to be charged.",
    "Every autumn, millions of monarch butterflies fly south to warmer places. Some travel "
    "more than four thousand kilometers. They rest in the same forests each winter, "
    "covering the trees in orange. In spring, they begin the long trip back north.",
    "A small cafe in the village now lets customers pay what they can. The owner says she "
    "wants everyone to enjoy a warm meal, even people with little money. Some people pay "
    "extra to help others. So far, the cafe has been busy every day.",
    "Drinking water is important for the body. Water helps control body temperature, "
    "carries nutrients to cells, and removes waste. People lose water when they sweat and "
    "breathe. Feeling thirsty, tired, or having a headache can be signs that you need to "
    "drink more.",
    "The town museum has a new room about the history of the local railway. Visitors can "
    "see old tickets, uniforms, and a model of the first steam train. There is also a short "
    "film with stories from former train drivers. The room is popular with school groups.",
]
SUMMARY_INSTRUCTIONS = [
    "Summarize this paragraph in one sentence.",
    "What is the main idea of this text? Answer briefly.",
]


# Arithmetic word problems: (template, the draw of its numbers and names). Each draw calls the RNG in the
# order the template's values appear, and a template is drawn 8 times before the next one, so the prompts
# (and the training data made from them) stay the same run after run.
MATH_TEMPLATES = [
    ("{n} has {a} {obj}. {m} gives {n} {b} more. How many {obj} does {n} have now?",
     lambda r: dict(zip("nm", r.sample(NAMES, 2)), a=r.randint(5, 40), b=r.randint(2, 20), obj=r.choice(COUNT_OBJECTS))),
    ("{n} buys {a} {item} for {p} dollars each. How much does {n} spend in total?",
     lambda r: dict(n=r.choice(NAMES), a=r.randint(2, 9), p=r.randint(2, 12), item=r.choice(BUY_ITEMS))),
    ("A bus has {a} passengers. At the next stop, {b} people get off and {c} people get on. "
     "How many passengers are on the bus now?",
     lambda r: {"a": (a := r.randint(15, 50)), "b": r.randint(2, a - 5), "c": r.randint(1, 15)}),
    ("{n} reads {a} pages every day. How many pages will {n} read in {d} days?",
     lambda r: dict(n=r.choice(NAMES), a=r.randint(5, 30), d=r.randint(3, 14))),
    ("There are {km} cookies shared equally among {k} children. How many cookies does each child get?",
     lambda r: {"k": (k := r.randint(2, 8)), "km": k * r.randint(2, 9)}),
    ("{n} walks {a} kilometers on Monday and {b} kilometers on Tuesday. How many kilometers does {n} walk in total?",
     lambda r: dict(n=r.choice(NAMES), a=r.randint(2, 12), b=r.randint(2, 12))),
    ("A store had {a} bottles of water. It sold {b} in the morning and {c} in the afternoon. "
     "How many bottles are left?",
     lambda r: {"a": (a := r.randint(40, 120)), "b": (b := r.randint(5, a // 2)), "c": r.randint(5, a - b - 1)}),
    ("{n} earns {a} dollars per hour. How much does {n} earn after working {h} hours?",
     lambda r: dict(n=r.choice(NAMES), a=r.randint(8, 25), h=r.randint(3, 40))),
    ("A garden has {r} rows of flowers with {c} flowers in each row. How many flowers are there in total?",
     lambda r: dict(r=r.randint(3, 12), c=r.randint(4, 15))),
    ("{n} had {a} dollars and spent {b} dollars on lunch. How much money does {n} have left?",
     lambda r: {"n": r.choice(NAMES), "a": (a := r.randint(20, 100)), "b": r.randint(4, a - 3)}),
    ("A rope is {km} meters long. It is cut into {k} equal pieces. How long is each piece?",
     lambda r: {"k": (k := r.randint(2, 8)), "km": k * r.randint(2, 10)}),
    ("{n} is {a} years old. {m} is {b} years older than {n}. How old will {m} be in {c} years?",
     lambda r: dict(zip("nm", r.sample(NAMES, 2)), a=r.randint(5, 40), b=r.randint(1, 10), c=r.randint(2, 10))),
]


def math_problems(rng):
    out = [text.format(**draw(rng)) for text, draw in MATH_TEMPLATES for _ in range(8)]
    return [p + rng.choice(MATH_SUFFIXES) for p in out]


def build():
    rng = random.Random(0)
    items = []  # (prompt, kind, handwritten)

    def add(prompt, kind, hand=False):
        items.append((prompt, kind, hand))

    for kind, prompts in HAND.items():
        for p in prompts:
            add(p, kind, True)

    for c in CONCEPTS:
        for aud in rng.sample(AUDIENCES, 3):
            add(f"Explain {c} to {aud}.", "explain")
        add(f"Give me a short, simple explanation of {c}.", "explain")

    for t in HOWTO_TASKS:
        for tpl in rng.sample(HOWTO_TEMPLATES, 2):
            add(tpl.format(t=t), "howto")

    for x in IDEA_THINGS:
        add(f"Give me {rng.choice(['three', 'five'])} ideas for {x}.", "list")
    for x in LIST_ITEMS:
        add(f"List {rng.choice(['three', 'four', 'five'])} {x}.", "list")

    for s in CREATIVE_SUBJECTS:
        for kind, tpl in rng.sample(CREATIVE_FORMS, 2):
            add(tpl.format(s=s), kind)

    for b in BUSINESSES:
        for tpl in BUSINESS_TEMPLATES:
            add(tpl.format(b=b), "slogan_ad")

    for tgt in EMAIL_TARGETS:
        for tone in rng.sample(EMAIL_TONES, 2):
            add(f"Write a {tone} email to {tgt}.", "email")

    for s in REWRITE_SENTENCES:
        for style in rng.sample(REWRITE_STYLES, 2):
            add(f"Rewrite this sentence to sound {style}: \"{s}\"", "rewrite")
        add(f"Paraphrase this sentence: \"{s}\"", "rewrite")

    for s in TRANSLATE_SENTENCES:
        for lang in rng.sample(LANGUAGES, 2):
            add(f"Translate into {lang}: {s}", "translation")

    for t in PY_FUNC_TASKS:
        add(rng.choice(PY_FUNC_TEMPLATES).format(t=t), "coding")
    for c in CODE_SNIPPETS:
        for tpl in CODE_TEMPLATES:
            add(tpl.format(c=c), "explain_code")
    for h in PY_HOW:
        add(f"How do I {h} in Python?", "coding")

    for p in math_problems(rng):
        add(p, "math_word")

    for a, b in COMPARE_PAIRS:
        for tpl in COMPARE_TEMPLATES:
            add(tpl.format(a=a, b=b), "compare")

    for x in PROS_CONS:
        for tpl in PROS_TEMPLATES:
            add(tpl.format(x=x), "pros_cons")

    for w in WORDS:
        add(f"What does the word \"{w}\" mean? Use it in a sentence.", "definition")
    for w in ADJECTIVES:
        add(f"Give me a synonym and an antonym for the word \"{w}\".", "definition")

    for s in ADVICE_SITUATIONS:
        add(rng.choice(ADVICE_TEMPLATES).format(s=s), "advice")

    for a in ANIMALS:
        for tpl in ANIMAL_TEMPLATES:
            add(tpl.format(a=a), "nature")
    for a in CLASSIFY_ANIMALS:
        add(f"Is {a} a mammal, bird, reptile, fish, or insect?", "classify")
    for r in REVIEWS:
        add(f"Is this review positive or negative? \"{r}\"", "classify")

    for d in DISHES:
        for tpl in rng.sample(DISH_TEMPLATES, 2):
            add(tpl.format(d=d), "cooking")

    for p in CITIES:
        for tpl in rng.sample(CITY_TEMPLATES, 2):
            add(tpl.format(p=p), "travel")

    for c in COUNTRIES:
        for tpl in COUNTRY_TEMPLATES:
            add(tpl.format(c=c), "trivia")

    for h in HABITS:
        add(f"What are the benefits of {h}?", "health")
    for h in HABIT_DAILY:
        add(f"How can I make {h} a regular habit?", "health")

    for s in SPORTS:
        for tpl in SPORT_TEMPLATES:
            add(tpl.format(s=s), "sports")

    for e in HISTORY_TOPICS:
        add(f"Tell me briefly about {e}.", "history")

    for para in PARAGRAPHS:
        for ins in SUMMARY_INSTRUCTIONS:
            add(f"{para}\n\n{ins}", "summarize")

    # Exclude anything identical to a benchmark prompt (or benchmark chat turn).
    bench = set()
    if os.path.exists(BENCH):
        with open(BENCH) as f:
            for line in f:
                d = json.loads(line)
                if "prompt" in d:
                    bench.add(d["prompt"].strip())
                for m in d.get("messages", []):
                    bench.add(m["content"].strip())

    seen, rows, n_hand = set(), [], 0
    for p, kind, hand in items:
        key = " ".join(p.lower().split())
        if key in seen or p.strip() in bench:
            continue
        seen.add(key)
        rows.append({"prompt": p, "kind": kind})
        n_hand += hand
    rng.shuffle(rows)
    return rows, n_hand


def main():
    rows, n_hand = build()
    with open(OUT, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} prompts ({n_hand} fully hand-written) to {OUT}")


if __name__ == "__main__":
    main()
